"""The LM4LV model and its algorithms: composition, losses, generation, loading, memory plan."""
