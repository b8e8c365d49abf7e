"""The job table: schema, the job state machine and the queue's transitions.

Everything that changes a job's status goes through `db.queue`, which applies the
transitions written down once in `db.states`.
"""
