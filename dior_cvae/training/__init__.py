"""Training-side helpers of the example scripts (not shipped with the weights)."""
