"""The method itself, pure torch/numpy (no Ray, no I/O): the method table and presets, view
sampling and refinement, the WCA/BiFTA scores and the other scorers, description refinement, text
banks, WaffleCLIP texts, CLIP-PGS patch selection and training step, the cascade rule, and the
view encoder that turns pixels into embeddings."""
