"""Model access: loading (TL 4.x bridge, TL 3.x HookedTransformer, plain HF), hook points,
and the HF generate / KV-cache plumbing. Imports nothing else of lofit_lens."""
