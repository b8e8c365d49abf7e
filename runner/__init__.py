"""Ray and scheduling: one worker actor per GPU (or CPU workers where there is none), each
draining the job table one job at a time."""
