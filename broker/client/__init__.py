"""Client SDKs for cameras (``device``) and operators (``admin``), used by the CLI, tests and demo."""
