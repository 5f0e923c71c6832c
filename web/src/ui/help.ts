// The Help panel: what a first visit needs to know (shown first when the URL holds no job).

import { h } from "./dom";

export function helpPanel(): HTMLElement {
  const code = (text: string) => h("code", {}, text);
  return h(
    "div.panel.help",
    { "aria-labelledby": "help-title" },
    h("h2#help-title", {}, "Help"),
    h("p", {}, "jobwire runs a Docker container on a worker and shows its output here live. The page's URL is the whole job: share it, and whoever opens it sees the same job, its logs and its outputs."),
    h("h3", {}, "Queues"),
    h(
      "p",
      {},
      "A queue is a name that workers serve: jobs submitted to it run on the workers connected to it. Type its name in the Queue field (or a full URL, ",
      code("https://host/q/name"),
      ", for a queue on another server). Anyone who knows a queue's name can submit to it.",
    ),
    h("h3", {}, "Running a worker"),
    h("p", {}, "On a machine with Docker: ", code("jobwire worker QUEUE --server HOST:PORT"), ". ", code("jobwire up"), " runs a server, this page and a worker on queue ", code("local"), " on one machine."),
    h("h3", {}, "What the URL holds"),
    h(
      "p",
      {},
      code("#?queue=…&job=…"),
      ": the queue and the job (image, command, env, files by hash), base64 JSON. Other parameters become env vars of the job. ",
      code("/j/ID"),
      " opens a job by its id.",
    ),
    h("h3", {}, "Running and cancelling"),
    h("p", {}, "Run submits the job; the same definition is the same job, so a finished result is shown again rather than re-run (Run again deletes it and runs anew). Cancel appears beside Run while the job waits or runs. The Queue panel's Cancel… stops a job for every user, so it asks first."),
    h("h3", {}, "Keyboard"),
    h(
      "p",
      {},
      "Tab and Shift+Tab move through every control, the terminal included. In the terminal, ",
      h("kbd", {}, "Escape"),
      " leaves it for the panel beside it (Job, Inputs…); from there Tab goes on to Run. The terminal keeps the last 5,000 lines; when earlier ones were dropped it says so and links the full log.",
    ),
  );
}
