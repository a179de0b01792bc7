"""Backend-agnostic resources: thin, typed wrappers that build requests and call the client's backend."""
