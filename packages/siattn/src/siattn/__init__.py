"""Scale-invariant attention: position-dependent affine logits (a_t * score + m_t) with p-RoPE, KV-cache decoding and transformers integration."""
