"""Ray distribution of meta-training and evaluation.

Importing this package does not import ``ray``: ``cluster.local_cluster`` has
to set Ray's loopback switch before the first import (see that module).
"""

# Logical CPUs each task-generator actor reserves. Generating a step's tasks
# costs little next to its inner loops, so two generators can share a core.
GENERATOR_NUM_CPUS = 0.5
