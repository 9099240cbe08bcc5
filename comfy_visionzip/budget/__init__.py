"""Token budget planning: what fits in the model's context, counted exactly, before anything is decoded.

The planner is the one place that knows the context window and counts the prompt; the command line,
the nodes and the Python API ask it, so "fits" means the same everywhere:

  - the context length comes from the checkpoint's text config (:func:`context_length`);
  - the whole first prompt is counted with the checkpoint's own chat template and tokenizer (system
    prompt, the video's placeholder tokens with every per-frame timestamp label or LLaVA-Video's time
    instruction, newline tokens, the question), see :class:`~comfy_visionzip.prompt.PromptBuilder`;
  - visual tokens per frame come from the family's own arranging code run on zeros
    (:func:`~comfy_visionzip.projection.visual_layout`);
  - room is reserved for the answer (``max_new_tokens``) and, where asked, for follow-up turns.

It fits in two places of a run, with the same counting: before decoding (:func:`plan_budget`: which
frames to sample) and before every prefill of a chat (:func:`fit_turn`: a first question whose
compressed video does not fit is thinned, a follow-up that does not fit is refused).

Policies: ``fit`` (default) thins the asked frame plan evenly until it fits and says so; ``strict``
refuses with the numbers and how to fix them. The planned prompt length is the prefilled one, to
the token (the chat checks it again before every prefill and never runs past the context).
"""

from .counts import POLICIES, TOKEN_LADDER, cap_budget, context_length, fit_frames, frames_for_budget, thinned_prompt
from .plan import BudgetPlan, plan_budget
from .turns import TurnFit, compressed_prompt, fit_turn

__all__ = ["POLICIES", "TOKEN_LADDER", "BudgetPlan", "TurnFit", "cap_budget", "compressed_prompt", "context_length",
           "fit_frames", "fit_turn", "frames_for_budget", "plan_budget", "thinned_prompt"]
