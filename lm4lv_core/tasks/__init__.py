"""What the training engine trains: LM4LV (lm4lv) and the MAE decoder (mae_decoder)."""
