"""One-command idiomreason sweep over models x conditions x datasets, optionally loading models in 4-bit
through nf4lora."""
