"""Evaluations: RewardBench scoring of reward models and generative judges."""
