"""MNIST: acquisition (mnist.py), offline preparation (prepare.py), device-resident sharding (sharding.py)."""
