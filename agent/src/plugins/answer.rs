//! Where the answer to a plugin's publish goes: back to a waiting task, or (a plugin process)
//! straight to the frame writer toward its host, with no task in between.

use std::fmt;

use tokio::sync::oneshot;

/// The answer a publish waits for (its code, or a batch's codes), given once. Dropped
/// unanswered (the plugin's task ended first), it tells its receiver so: a channel's receiver
/// sees the channel closed, a plugin process is answered "stopping".
pub struct Answer<T: Send + 'static> {
    deliver: Option<Box<dyn FnOnce(Option<T>) + Send>>,
}

impl<T: Send + 'static> Answer<T> {
    /// An answer to await at the other end of a channel.
    pub fn channel() -> (Answer<T>, oneshot::Receiver<T>) {
        let (tx, rx) = oneshot::channel();
        let answer = Answer::to(move |given| {
            if let Some(given) = given {
                let _ = tx.send(given);
            }
        });
        (answer, rx)
    }

    /// An answer handed to `deliver` when it is given (`None`: dropped unanswered).
    pub fn to(deliver: impl FnOnce(Option<T>) + Send + 'static) -> Answer<T> {
        Answer {
            deliver: Some(Box::new(deliver)),
        }
    }

    pub fn send(mut self, given: T) {
        if let Some(deliver) = self.deliver.take() {
            deliver(Some(given));
        }
    }
}

impl<T: Send + 'static> Drop for Answer<T> {
    fn drop(&mut self) {
        if let Some(deliver) = self.deliver.take() {
            deliver(None);
        }
    }
}

impl<T: Send + 'static> fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Answer")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_given_answer_is_delivered_once_and_a_dropped_one_says_so() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = |seen: &Arc<Mutex<Vec<Option<i32>>>>| {
            let seen = seen.clone();
            Answer::to(move |given| seen.lock().unwrap().push(given))
        };
        record(&seen).send(7);
        drop(record(&seen));
        assert_eq!(*seen.lock().unwrap(), vec![Some(7), None]);
    }

    #[tokio::test]
    async fn a_channel_answer_reaches_its_receiver_or_closes_it() {
        let (answer, given) = Answer::channel();
        answer.send(3);
        assert_eq!(given.await, Ok(3));
        let (answer, given) = Answer::<i32>::channel();
        drop(answer);
        assert!(given.await.is_err());
    }
}
