"""Evaluation: bits per byte, CORE (base models), chat tasks, and the code-execution sandbox."""
