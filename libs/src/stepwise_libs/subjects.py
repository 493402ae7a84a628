"""Names of the JetStream streams, subjects, KV buckets and object store.

Every event of a session lives on its own subject inside one events stream,
so one session can be read or tailed with a subject filter.
"""

EVENTS_STREAM = "STEPWISE_EVENTS"
EVENTS_PREFIX = "stepwise.events"
COMMANDS_STREAM = "STEPWISE_COMMANDS"
COMMANDS_PREFIX = "stepwise.cmd"
PLANNER_COMMANDS = f"{COMMANDS_PREFIX}.planner"
EXECUTOR_COMMANDS = f"{COMMANDS_PREFIX}.executor"

PLANNER_CONSUMER = "planner"
EXECUTOR_CONSUMER = "executor"
PROJECTOR_CONSUMER = "projector"

CONTROL_BUCKET = "stepwise_control"
LEASES_BUCKET = "stepwise_leases"
SCREENSHOTS_BUCKET = "stepwise_screenshots"
# Secret values of sessions, key = session id; see stepwise_libs.secrets.
SECRETS_BUCKET = "stepwise_secrets"

# Core NATS subject on which one executor instance receives commands forwarded
# from other replicas for sessions whose browser it owns.
EXECUTOR_INBOX_PREFIX = "stepwise.executor.inbox"

# Header carrying the per-session sequence number of an event, so a reader can
# find an event's seq without decoding the body.
SEQ_HEADER = "Stepwise-Seq"


def session_events_subject(session_id: str) -> str:
    """Return the events subject of one session."""
    return f"{EVENTS_PREFIX}.{session_id}"


def planner_command_subject(command_type: str) -> str:
    return f"{PLANNER_COMMANDS}.{command_type}"


def executor_command_subject(command_type: str) -> str:
    return f"{EXECUTOR_COMMANDS}.{command_type}"


def executor_inbox_subject(instance_id: str) -> str:
    return f"{EXECUTOR_INBOX_PREFIX}.{instance_id}"


def screenshot_object_name(session_id: str, step: int | str, index: int) -> str:
    """Return the object-store name of a screenshot: `<session>/<step>/<n>.png`."""
    return f"{session_id}/{step}/{index}.png"
