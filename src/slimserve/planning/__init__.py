"""`slimserve plan`: capacity planning from measured profiles (policies/planning.py decides)."""
