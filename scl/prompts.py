"""Every sentence the self-correction protocol says to the model, verbatim from the paper's released code.

Turn 1 asks the question with lettered options; turn 2 appends a review message (no external
feedback). Names: "sp" = standard prompt (no review turn), "cp" = the critique prompt (code ID 0),
"vp1".."vp3" = the visual prompts (IDs 1..3).
"""

COT = "Explain your reasoning step-by-step."
FORMAT = ("Your final answer should be put between two ##, like ## A ## (if your final answer is A), "
          "at the end of your response.")

REVIEW_PROMPTS = {
    # ID 0: the text-only critique prompt of Huang et al. 2023, "LLMs cannot self-correct reasoning yet".
    "cp": "Review your previous answer and find problems with your answer. Based on the problems you "
          "found, improve your answer.",
    # ID 1 (VP-1): details of the image that were missed.
    "vp1": "Review your previous answer and ensure that all relevant aspects of the image have been "
           "considered. Are there any elements or details that you missed? Based on your review, improve "
           "your answer.",
    # ID 2 (VP-2, the default of the paper's inference.py): the context and purpose of the scene.
    "vp2": "Review your contextual understanding of the image. Have you correctly interpreted the overall "
           "context and purpose of the scene? Based on your review, improve your answer.",
    # ID 3 (VP-3): a comprehensive reading of the scene.
    "vp3": "Review your answer and ensure that your understanding of the image is comprehensive and "
           "detailed. Are there any aspects of the scene that you have omitted or misinterpreted? Based on "
           "your review, improve your answer.",
}
PROMPT_NAMES = ("sp", "cp", "vp1", "vp2", "vp3")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def lettered(options):
    """["A. first", "B. second", ...]: one layout of options, so one extractor serves every prompt."""
    if not 1 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 1 to {len(LETTERS)} options, got {len(options)}")
    return [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]


def turn1_message(question, options, hint=None):
    """The turn-1 user message: [Hint: ...], question, lettered options, CoT and format sentences,
    one per line. This full message is also the prompt of every SelfCorSet pair."""
    return "\n".join(([f"Hint: {hint}"] if hint else []) + [question, *lettered(options), COT, FORMAT])


def turn1_message_official(question, options):
    """The turn-1 message as the paper's inference.py wrote it, for comparing with its numbers: no hint,
    the options inline (` A. x B. y`), the CoT sentence on a new line, the format sentence after a space.
    (MMStar's and RealWorldQA's options, split out by our loader, come back inline the same way.)"""
    return f"{question} {' '.join(lettered(options))}\n{COT} {FORMAT}"


def review_message(name):
    """The turn-2 user message for a review prompt: the prompt, then the CoT and format sentences."""
    if name not in REVIEW_PROMPTS:
        raise ValueError(f"{name!r} is not a review prompt (sp has no review turn); one of {', '.join(REVIEW_PROMPTS)}")
    return f"{REVIEW_PROMPTS[name]} {COT} {FORMAT}"
