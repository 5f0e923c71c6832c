"""AI agents as users: an MCP server (tools over the SDK) and /llms.txt, for any jobwire server."""
