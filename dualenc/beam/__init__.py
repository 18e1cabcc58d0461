"""Apache Beam front-ends: pipeline options and the gallery index built with `RunInference`."""
