"""accord: align and merge neural networks."""
