"""The exit statuses of the batch job (and the chat's and gptoss-compile's refusal to start), which the launcher
reads too."""

EXIT_FAILED_REQUESTS = 1  # the job ran to its end, and some requests (in this run or an earlier one) failed
EXIT_CANNOT_START = 2  # a bad setting, input, checkpoint or output; or another job holds the output
EXIT_PEER_LOST = 3  # a process of a multi-process job stopped: a step across the processes failed
EXIT_DOES_NOT_FIT = 1  # gptoss-compile: a program does not fit the chip's memory
