"""Constraints that several parts of the job spec share."""

NO_NUL = r"^[^\x00-\x1f\x7f]*$"  # a file path: no NUL byte (the OS refuses it) nor other control characters
SEED_MAX = 2**32 - 1  # what every seeded generator accepts (torch.manual_seed fails from 2**64)
