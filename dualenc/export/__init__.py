"""Export: each tower as a standalone SavedModel (and TFLite), loaded back the same way by every
caller, and a keras-hub CLIP/SigLIP preset written as a ready-to-search run."""
