"""Independent re-implementations ("peers") of published diffusion-LM generation loops, for tests.

Each module re-writes one family's sampling loop from its paper and the algorithm of its reference code,
as a plain, slow, obviously-correct loop in that family's own conventions. They exist so that
``fastdiff.generate`` can be compared against something it did not compute itself
(``tests/test_generate_peers.py``). Every peer takes the same model object ``fastdiff.generate`` gets
and a ``torch.Generator`` for all of its randomness.

* :mod:`.models`    tiny seeded transformers following the LM calling convention (and the cache protocols)
* :mod:`.llada`     LLaDA (Nie et al. 2025), ML-GSAI/LLaDA ``generate``
* :mod:`.fast_dllm` Fast-dLLM (Wu et al. 2025): threshold / factor decoding, prefix and dual caches
* :mod:`.dream`     Dream 7B (Ye et al. 2025), ``DreamGenerationMixin._sample``
* :mod:`.mdlm`      MDLM (Sahoo et al. 2024) ddpm-cache sampler; DUO (Sahoo et al. 2025) ancestral sampler
* :mod:`.bd3lm`     BD3-LM (Arriola et al. 2025) semi-autoregressive first-hitting sampler
"""
