//! The registry: workflow name -> workflow function, activity name -> options (queue,
//! timeouts, retry policy) and implementation. The product's factory fills one; the
//! runtime only looks things up in it, so adding a workflow is a registry entry.

use std::{collections::HashMap, future::Future, sync::Arc};

use baton_transport::{Payload, ids};
use futures::{FutureExt, future::BoxFuture};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    activity::ActivityContext,
    context::{ActivityDef, WorkflowContext},
    error::{ActivityError, WorkflowError},
    options::ActivityOptions,
};

/// Activity name -> options in force.
pub type Policies = HashMap<String, ActivityOptions>;

/// A type-erased workflow function.
pub type WorkflowFn = Arc<
    dyn Fn(WorkflowContext, Payload) -> BoxFuture<'static, Result<Payload, WorkflowError>>
        + Send
        + Sync,
>;

/// A type-erased activity function.
pub type ActivityFn = Arc<
    dyn Fn(ActivityContext, Payload) -> BoxFuture<'static, Result<Payload, ActivityError>>
        + Send
        + Sync,
>;

type InputCheck = Arc<dyn Fn(&Payload) -> Result<(), String> + Send + Sync>;

/// A registered workflow.
#[derive(Clone)]
pub struct WorkflowDef {
    /// Its name (the `<workflow_type>` of `baton.start.<workflow_type>`).
    pub name: String,
    /// The function.
    pub run: WorkflowFn,
    check_input: InputCheck,
}

impl WorkflowDef {
    /// Checks that an input decodes as the workflow's input type, so that a start with a
    /// malformed input is refused at the edge instead of failing later.
    pub fn check_input(&self, input: &Payload) -> Result<(), String> {
        (self.check_input)(input)
    }
}

/// Errors of registration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name breaks the naming rules.
    #[error("{0}")]
    InvalidName(#[from] ids::InvalidId),
    /// A name was registered twice.
    #[error("{0} {1:?} is registered twice")]
    Duplicate(&'static str, String),
}

/// Workflows, activity options and activity implementations.
#[derive(Clone, Default)]
pub struct Registry {
    workflows: HashMap<String, WorkflowDef>,
    policies: Arc<Policies>,
    activities: HashMap<String, ActivityFn>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a workflow: a deterministic async function over a [`WorkflowContext`].
    pub fn workflow<I, O, F, Fut>(&mut self, name: &str, f: F) -> Result<&mut Self, Error>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        ids::validate_name("workflow type", name)?;
        if self.workflows.contains_key(name) {
            return Err(Error::Duplicate("workflow", name.into()));
        }
        let f = Arc::new(f);
        let run: WorkflowFn = Arc::new(move |ctx, input: Payload| {
            let f = f.clone();
            async move {
                let input: I = input
                    .decode()
                    .map_err(|e| WorkflowError::new("InvalidInput", e.to_string()))?;
                let output = f(ctx, input).await?;
                Payload::encode(&output)
                    .map_err(|e| WorkflowError::new("EncodeError", e.to_string()))
            }
            .boxed()
        });
        let check_input: InputCheck =
            Arc::new(|p: &Payload| p.decode::<I>().map(|_| ()).map_err(|e| e.to_string()));
        self.workflows.insert(
            name.into(),
            WorkflowDef {
                name: name.into(),
                run,
                check_input,
            },
        );
        Ok(self)
    }

    /// Registers an activity: its default options (the central policy) and its
    /// implementation, an async function of an [`ActivityContext`] and the input.
    pub fn activity<I, O, F, Fut>(
        &mut self,
        def: &ActivityDef<I, O>,
        options: ActivityOptions,
        f: F,
    ) -> Result<&mut Self, Error>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        ids::validate_name("activity name", def.name)?;
        ids::validate_name("task queue", &options.task_queue)?;
        if self.activities.contains_key(def.name) {
            return Err(Error::Duplicate("activity", def.name.into()));
        }
        let f = Arc::new(f);
        let run: ActivityFn = Arc::new(move |ctx, input: Payload| {
            let f = f.clone();
            async move {
                let input: I = input
                    .decode()
                    .map_err(|e| ActivityError::non_retryable("InvalidInput", e.to_string()))?;
                let output = f(ctx, input).await?;
                Payload::encode(&output)
                    .map_err(|e| ActivityError::non_retryable("EncodeError", e.to_string()))
            }
            .boxed()
        });
        self.activities.insert(def.name.into(), run);
        Arc::make_mut(&mut self.policies).insert(def.name.into(), options);
        Ok(self)
    }

    /// Replaces the options of an activity (central overrides from configuration).
    pub fn set_options(&mut self, activity: &str, options: ActivityOptions) {
        Arc::make_mut(&mut self.policies).insert(activity.into(), options);
    }

    /// A workflow by name.
    pub fn workflow_def(&self, name: &str) -> Option<&WorkflowDef> {
        self.workflows.get(name)
    }

    /// The registered workflow names, sorted.
    pub fn workflow_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.workflows.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// An activity implementation by name.
    pub fn activity_fn(&self, name: &str) -> Option<&ActivityFn> {
        self.activities.get(name)
    }

    /// The options of every activity.
    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// The activities routed to a queue, sorted.
    pub fn activities_of_queue(&self, queue: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .policies
            .iter()
            .filter(|(_, o)| o.task_queue == queue)
            .map(|(n, _)| n.as_str())
            .collect();
        v.sort_unstable();
        v
    }
}
