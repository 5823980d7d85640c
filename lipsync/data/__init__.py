"""Making training data: the synthetic talking-face corpus (``synth``), the processing pipeline
for real footage (``process``), and the datasets that training reads (``datasets``)."""
