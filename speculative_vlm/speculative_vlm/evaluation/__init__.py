"""Closed-loop evaluation in the simulated Go2: does the robot do what it is told?

Episodes (:mod:`.episodes`) are random scenes and instructions from families of tasks
(:mod:`.families`), drawn from a train-like or a held-out split (:mod:`.splits`) whose colour/shape
combinations, scene layouts and phrasings never meet. A policy (:mod:`.policies`: the scripted
expert of :mod:`.expert`, or a model through the project's real decoding) answers each step with a
command; :mod:`.runner` carries it through the grammar, the parser, the motion node's limits and
the simulated Go2's dynamics (:mod:`.world`); :mod:`.success` judges the episode by its family's
rule; :mod:`.single_step` measures one-prompt direction correctness on the expert's states;
:mod:`.report` writes the markdown report, the CSVs and the trajectory plots (:mod:`.plots`);
:mod:`.graph` runs episodes through the full ROS graph instead. ``speculative-vlm eval``
(:mod:`.run`) ties it together. Training code takes its examples from :mod:`.examples`, which
rolls the expert out on the train split only.
"""
