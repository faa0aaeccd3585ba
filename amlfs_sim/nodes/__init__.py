"""The emulated Lustre nodes (SSH); filled in by the node emulator issue."""
