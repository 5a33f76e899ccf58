"""grokserve.cluster: cluster spec, placement, the Ray Serve application and the `grokserve` CLI."""
