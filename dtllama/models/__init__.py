"""Model families with Hugging Face parameter names, their configs, flavors and checkpoint I/O."""
