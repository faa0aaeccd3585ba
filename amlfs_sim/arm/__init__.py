"""The emulated Azure Resource Manager (Compute) surface."""
