"""pi0 and pi0.5 (LeRobot's checkpoints) on the prunable executor.

``configuration`` reads ``config.json``, ``modeling`` builds the model from transformers' SigLIP and Gemma modules
with LeRobot's parameter names, ``processing`` holds the image / prompt / normalisation steps, ``checkpoint`` loads
a directory, ``inference`` runs one pruned step, ``tiny`` writes tiny random checkpoints in LeRobot's layout.
"""
