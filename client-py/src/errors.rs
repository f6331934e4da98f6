//! The exception hierarchy, rooted at `memsock.Error`, and the mapping of
//! every Rust error onto it.

use memsock::{ClientError, ControlError, LoanError, RecvError, SendError, TryRecvError};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{PyErr, create_exception};

create_exception!(memsock, Error, PyException, "Every memsock error.");
create_exception!(memsock, BrokerUnreachable, Error, "No broker answers on the socket (is `memsock broker` running?).");
create_exception!(
    memsock,
    BrokerPermissionDenied,
    Error,
    "The broker's socket exists but admits only its own user (and members of its `--group`)."
);
create_exception!(memsock, Disconnected, Error, "The connection to the broker is gone (it shut down).");
create_exception!(memsock, Refused, Error, "The broker refused a request.");
create_exception!(memsock, NoSuchStream, Refused, "No stream has that name.");
create_exception!(memsock, StreamExists, Refused, "The stream already has a publisher, or a different geometry.");
create_exception!(memsock, CreditsRefused, Refused, "The pool cannot honour the credits asked for.");
create_exception!(
    memsock,
    NotPermitted,
    Refused,
    "This client may not do that to the stream (close one it does not publish, as another user)."
);
create_exception!(
    memsock,
    LimitReached,
    Refused,
    "A limit of the broker's would be passed (streams, subscriptions, waits, memory, connections)."
);
create_exception!(memsock, InvalidArgument, Error, "An argument is out of range (name, size, credits, policy).");
create_exception!(memsock, PublisherGone, Error, "The publisher left; every frame it sent has been received.");
create_exception!(memsock, PublisherBack, Error, "A new publisher took the stream over; its frames follow.");
create_exception!(memsock, StreamClosed, Error, "The stream was closed and every frame in it received.");
create_exception!(memsock, Detached, Error, "The subscriber was detached from its stream.");
create_exception!(memsock, CreditsExhausted, Error, "The subscriber holds as many frames as it has credits.");
create_exception!(memsock, WouldBlock, Error, "A lossless subscriber has no room (send with a timeout to wait).");
create_exception!(memsock, Timeout, Error, "The timeout passed with nothing to receive or no room to send.");
create_exception!(memsock, Corrupt, Error, "A peer broke the shared-memory protocol.");
create_exception!(
    memsock,
    Forked,
    Error,
    "A client, publisher or subscriber made before a fork, used in the forked child: the lease is the parent's \
     (call memsock.connect() in the child)."
);

/// What a forked child is told to do, after the reason.
const IN_THE_CHILD: &str = " (call memsock.connect() in the child for its own connection)";

/// Registers the exception classes in the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("BrokerUnreachable", py.get_type::<BrokerUnreachable>())?;
    m.add("BrokerPermissionDenied", py.get_type::<BrokerPermissionDenied>())?;
    m.add("Disconnected", py.get_type::<Disconnected>())?;
    m.add("Refused", py.get_type::<Refused>())?;
    m.add("NoSuchStream", py.get_type::<NoSuchStream>())?;
    m.add("StreamExists", py.get_type::<StreamExists>())?;
    m.add("CreditsRefused", py.get_type::<CreditsRefused>())?;
    m.add("NotPermitted", py.get_type::<NotPermitted>())?;
    m.add("LimitReached", py.get_type::<LimitReached>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("PublisherGone", py.get_type::<PublisherGone>())?;
    m.add("PublisherBack", py.get_type::<PublisherBack>())?;
    m.add("StreamClosed", py.get_type::<StreamClosed>())?;
    m.add("Detached", py.get_type::<Detached>())?;
    m.add("CreditsExhausted", py.get_type::<CreditsExhausted>())?;
    m.add("WouldBlock", py.get_type::<WouldBlock>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("Corrupt", py.get_type::<Corrupt>())?;
    m.add("Forked", py.get_type::<Forked>())?;
    Ok(())
}

/// A client (control-plane) error as a Python exception.
pub(crate) fn client(e: ClientError) -> PyErr {
    let text = e.to_string();
    match e {
        ClientError::Connect { .. } | ClientError::Autostart { .. } => BrokerUnreachable::new_err(text),
        ClientError::PermissionDenied { .. } => BrokerPermissionDenied::new_err(text),
        ClientError::Disconnected(_) => Disconnected::new_err(text),
        ClientError::Timeout(_) => Timeout::new_err(text),
        ClientError::Forked { .. } => Forked::new_err(text + IN_THE_CHILD),
        ClientError::Refused(c) => match c {
            ControlError::NoSuchStream(_) => NoSuchStream::new_err(text),
            ControlError::PublisherExists { .. } | ControlError::GeometryMismatch { .. } => StreamExists::new_err(text),
            ControlError::CreditsRefused { .. } => CreditsRefused::new_err(text),
            ControlError::InvalidName(_) | ControlError::InvalidConfig(_) => InvalidArgument::new_err(text),
            ControlError::StreamClosed(_) => StreamClosed::new_err(text),
            ControlError::CloseNotPermitted { .. } => NotPermitted::new_err(text),
            ControlError::LimitReached { .. } => LimitReached::new_err(text),
            _ => Refused::new_err(text),
        },
        _ => Error::new_err(text),
    }
}

/// A receive error as a Python exception.
pub(crate) fn recv(e: RecvError) -> PyErr {
    let text = e.to_string();
    match e {
        RecvError::Timeout => Timeout::new_err(text),
        RecvError::CreditsExhausted { .. } => CreditsExhausted::new_err(text),
        RecvError::Detached => Detached::new_err(text),
        RecvError::Closed => StreamClosed::new_err(text),
        RecvError::PublisherGone => PublisherGone::new_err(text),
        RecvError::PublisherBack => PublisherBack::new_err(text),
        RecvError::Forked => Forked::new_err(text + IN_THE_CHILD),
        _ => Corrupt::new_err(text),
    }
}

/// A non-blocking receive error as a Python exception.
pub(crate) fn try_recv(e: TryRecvError) -> PyErr {
    recv(e.into())
}

/// A send error as a Python exception.
pub(crate) fn send(e: SendError) -> PyErr {
    let text = e.to_string();
    match e {
        SendError::WouldBlock { .. } => WouldBlock::new_err(text),
        SendError::Timeout => Timeout::new_err(text),
        SendError::Closed => StreamClosed::new_err(text),
        SendError::TooLarge { .. } => InvalidArgument::new_err(text),
        SendError::Forked | SendError::Loan(LoanError::Forked) => Forked::new_err(text + IN_THE_CHILD),
        _ => Error::new_err(text),
    }
}

/// A loan error as a Python exception.
pub(crate) fn loan(e: LoanError) -> PyErr {
    let text = e.to_string();
    match e {
        LoanError::Closed => StreamClosed::new_err(text),
        LoanError::Forked => Forked::new_err(text + IN_THE_CHILD),
        _ => Error::new_err(text),
    }
}
