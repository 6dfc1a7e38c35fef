"""What a run measures about the machine it runs on, shared by training (trainer/) and inference (inference/):
whether the CPU multiplies bf16 natively, and one way to time two ways of doing the same work against each other.
Imports nothing else from the project."""
