"""Small-LM pretraining with a choice of attention (siattn variants, baselines) and precision recipe
(bf16 / MXFP8), evaluated for length generalisation."""
