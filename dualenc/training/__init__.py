"""Training: one run start to finish (`loop`), presets, model selection and resume, the frozen
backbone feature cache and the training curves."""
