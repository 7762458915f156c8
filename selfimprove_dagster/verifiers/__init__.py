"""Is an answer right? One module per task type.

Promise: a verifier reads a completion and the row it answers and returns a verdict
(correct, the extracted answer, a reason); it never raises on model output it cannot
parse (that is a wrong answer with a reason).
"""
