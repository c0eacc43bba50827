"""What is trained: integer grids, rounding rules, and the layers whose weights live on them (DQT, BitNet, float)."""
