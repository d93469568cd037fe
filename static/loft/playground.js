// Playground: send the same conversation to /v1/chat/completions once per column that has a
// model picked, and stream each answer into its column as server-sent events. The page's
// session authenticates the calls (with its CSRF token). A column that fails says why in its
// own error line; the others go on. Without JavaScript the form posts to the page, which
// answers with every column at once.
(function () {
  "use strict";
  const form = document.getElementById("playground-form");
  if (!form || !window.fetch || !window.TextDecoder) return;
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const errorBox = document.getElementById("playground-error");

  function show(element, text) {
    element.textContent = text;
    element.hidden = !text;
  }

  async function problemOf(response) {
    const problem = await response.json().catch(function () { return {}; });
    return (problem.error && problem.error.message) ||
      "The request failed (HTTP " + response.status + ").";
  }

  async function stream(column, body) {
    const number = column.dataset.column;
    const answer = document.getElementById("answer-" + number);
    const usage = document.getElementById("usage-" + number);
    const response = await fetch(form.dataset.chatUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      credentials: "same-origin",
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await problemOf(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") return;
        if (!line || line.charAt(0) === ":") continue;
        const event = JSON.parse(line);
        if (event.error) throw new Error(event.error.message);
        (event.choices || []).forEach(function (choice) {
          answer.textContent += (choice.delta && choice.delta.content) || "";
          if (choice.finish_reason) finish = choice.finish_reason;
        });
        if (event.usage) {
          usage.textContent = event.usage.completion_tokens + " tokens, finish reason " + finish;
        }
      }
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    show(errorBox, "");
    const messages = [];
    if (form.system.value.trim()) messages.push({ role: "system", content: form.system.value });
    messages.push({ role: "user", content: form.prompt.value });
    const temperature = Number(form.temperature.value);
    const request = {
      messages: messages,
      max_tokens: Number(form.max_tokens.value) || 128,
      temperature: isNaN(temperature) ? 0 : temperature,
      stream: true,
      stream_options: { include_usage: true },
    };
    const running = [];
    form.querySelectorAll(".playground-column").forEach(function (column) {
      const number = column.dataset.column;
      const model = column.querySelector("select").value;
      document.getElementById("answer-" + number).textContent = "";
      document.getElementById("usage-" + number).textContent = "";
      const columnError = document.getElementById("error-" + number);
      show(columnError, "");
      if (!model) return;
      running.push(
        stream(column, Object.assign({ model: model }, request)).catch(function (error) {
          show(columnError, error.message);
        })
      );
    });
    if (!running.length) {
      show(errorBox, "Pick a model for at least one column.");
      return;
    }
    const button = form.querySelector("button");
    button.disabled = true;
    Promise.all(running).finally(function () { button.disabled = false; });
  });
})();
