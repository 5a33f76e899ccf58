"""grokserve.router: the client-facing Generation service, scheduler, KV cache and expert dispatcher."""
