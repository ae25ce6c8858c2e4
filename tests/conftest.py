"""Gates and fixtures shared by every test; the helpers themselves are in ``kit/``."""
from kit.gates import IN_CI, ROOT, project_tool, require_tool  # noqa: F401  (the gates)
from kit.site import rig  # noqa: F401  (a fixture: every test may ask for a Rig)
