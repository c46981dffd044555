"""Scheduling: the plugin pipeline (filters, scorers, pickers, profiles), the pods and requests a
replica follows, and :class:`~infermesh.libs.scheduling.core.SchedulerCore`, one replica's
decisions. The scheduler service answers ``im.schedule`` with it; an ingress that schedules
itself runs it in its own process."""
