"""ostiary-ucspi: Ostiary 4.0's challenge/response, one connection per process."""
