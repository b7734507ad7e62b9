"""Model compression in the engine: distillation, structured pruning, hashed weight sharing."""
