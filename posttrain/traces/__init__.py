"""R1-style reasoning traces: sample from a teacher, verify with rewards, filter, and write SFT-ready shards
with a resume ledger (`posttrain traces RECIPE.yaml`)."""

from posttrain.data.trace_runs import accepted_files
from posttrain.traces.config import TracesRecipe
from posttrain.traces.pipeline import run_traces

__all__ = ["TracesRecipe", "accepted_files", "run_traces"]
