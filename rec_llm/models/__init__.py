"""Models. They name logical axes only ('batch', 'vocab', ...), never mesh axes."""
