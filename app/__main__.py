"""``python -m mcp_medsam`` is the ``mcp-medsam`` command."""

from .cli import main

main()
