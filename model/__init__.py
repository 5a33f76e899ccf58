"""grokserve.model: Grok-1 config, layers, reference engine, checkpoints and tokenizer."""
