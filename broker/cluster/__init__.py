"""Fleet events: what one replica's committed change asks of every other replica.

Owns: the event kinds, the codec between ``broker.outcomes.Effects`` and event payloads, and the
``EventFeed`` thread that reads the store's events table and hands other replicas' events to the
event loop. Core writers append an event in the same unit of work as the change; the service layer
(``broker.service.cluster``) applies what the feed delivers.

May import: broker.store, broker.outcomes, base modules. Never grpc.
"""
