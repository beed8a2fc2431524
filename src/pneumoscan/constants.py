"""Names and defaults the command line needs before any work starts, kept free of torch so that
``pneumoscan --help`` answers in well under a second. The modules that use them import them from here."""

# 16 images per forward pass: on a CPU nearly as fast as 32, and the peak memory of a run stays near 1.2 GB
# instead of 1.6 GB (measured with benchmarks/bench_predict.py).
BATCH_SIZE = 16

# Network arithmetic: auto = the precision the model's calibration and thresholds were fitted in (its record).
PRECISIONS = ("auto", "float32", "bfloat16")

# The keys of pneumoscan.models.ARCHS, in its order (a test keeps the two equal).
ARCH_NAMES = ("resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
