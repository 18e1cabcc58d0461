"""Distribution: where the towers run (one device, split over two, data-parallel or several
machines), `TF_CONFIG`, the workers' rendezvous and ``python -m dualenc.launch``."""
